//! PROXY protocol header parser (HAProxy's proxy-protocol.txt, versions 1 and 2): reads the header a load
//! balancer puts in front of a connection and returns the original source and destination, its TLVs, and how many
//! bytes it takes (Envoy's `envoy.filters.listener.proxy_protocol`).
//!
//! # How this copies Envoy and the spec
//!
//! Envoy (source/extensions/filters/listener/proxy_protocol/proxy_protocol.cc) tells versions apart by their
//! signatures: the 12-byte v2 signature, or `PROXY ` for v1. With `allow_requests_without_proxy_protocol` a
//! connection whose first bytes match neither goes on untouched; without it the connection is closed. We answer
//! [`ProxyParse::NotProxy`] as soon as the bytes seen can no longer be either signature and leave that choice to the
//! caller. Once a signature matched, any defect is [`ProxyParse::Invalid`] (Envoy closes the connection).
//!
//! v1 is parsed strictly as the spec writes it: `PROXY` SP (`TCP4`|`TCP6`) SP src SP dst SP sport SP dport CRLF with
//! single spaces, addresses of the announced family (IPv4 dotted quads without leading zeros), ports 0..=65535 in
//! decimal without sign or leading zeros, a CRLF within the first 107 bytes and no lone CR or LF. `PROXY UNKNOWN`
//! may be followed by anything up to the CRLF and carries no addresses. (Envoy is looser: it splits on runs of
//! spaces, trims trailing whitespace, reads ports with `SimpleAtoi` and allows 108 bytes.)
//!
//! v2: version nibble 2; command LOCAL (addresses and TLVs ignored, as Envoy and the spec say; the family byte is
//! not checked) or PROXY; for PROXY the family/transport byte must be one the spec lists: TCP or UDP over IPv4/IPv6
//! give addresses, while AF_UNSPEC (`\x00`) and AF_UNIX (`\x31`, `\x32`) are accepted without addresses, the spec's
//! "fall back to UNSPEC" (Envoy closes such connections instead). The length must cover the family's address block;
//! TLVs after it are returned in order and must fill the rest of the header exactly (Envoy's `parseTlvs` bounds
//! checks). For AF_UNSPEC the block is opaque and no TLVs are read.
//!
//! As in Envoy, PROXY addresses must be unicast: not the unspecified address, not multicast, not IPv4 broadcast.
//!
//! The parser is stateless: the caller passes everything peeked so far and calls again with more. It never panics
//! and allocates only the TLV values it returns (never more than the bytes it was given).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 line, CRLF included (the spec's worst case, `PROXY UNKNOWN` with two full IPv6 addresses).
pub const V1_MAX_LEN: usize = 107;

/// The v2 signature: CR LF CR LF NUL CR LF "QUIT" LF.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What the bytes at the start of a connection say about a PROXY protocol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyParse {
    /// A valid beginning of a header; call again with more bytes.
    NeedMore,
    /// A header that matched a signature but is malformed: close the connection.
    Invalid(&'static str),
    /// The bytes cannot be a PROXY header: close, unless `allow_requests_without_proxy_protocol`.
    NotProxy,
    /// A complete, valid header.
    Header(ProxyHeader),
}

/// A parsed PROXY protocol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes the header takes at the start of the stream; the caller consumes exactly these before the payload.
    pub consumed: usize,
    /// (source, destination) as sent by the proxy; None for v1 UNKNOWN, v2 LOCAL, AF_UNSPEC and AF_UNIX, where the
    /// real connection's addresses stay in force.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// v2 type-length-value extensions (type, value) in wire order, for PROXY commands with addresses or AF_UNIX.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

const V1_SIGNATURE: &[u8] = b"PROXY ";
const V1_UNKNOWN: &[u8] = b"UNKNOWN";
const V2_HEADER_LEN: usize = 16;
const V2_VERSION: u8 = 2;
const V2_LOCAL: u8 = 0;
const V2_PROXY: u8 = 1;

const V1_TOO_LONG: &str = "PROXY v1 line has no CRLF within 107 bytes";
const NOT_UNICAST: &str = "PROXY header address is not a unicast address";

/// Parses the PROXY protocol header at the start of `buf`, the bytes peeked from a new connection so far.
pub fn parse(buf: &[u8]) -> ProxyParse {
    if starts_like(buf, &V2_SIGNATURE) {
        return if buf.len() < V2_SIGNATURE.len() { ProxyParse::NeedMore } else { parse_v2(buf) };
    }
    if starts_like(buf, V1_SIGNATURE) {
        return if buf.len() < V1_SIGNATURE.len() { ProxyParse::NeedMore } else { parse_v1(buf) };
    }
    ProxyParse::NotProxy
}

/// Whether `buf` and `signature` agree on every byte both have (so an empty or short buffer may still match).
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf.get(..n) == signature.get(..n)
}

fn parse_v1(buf: &[u8]) -> ProxyParse {
    for (i, &b) in buf.iter().enumerate().take(V1_MAX_LEN) {
        if b == b'\n' {
            // A CRLF is taken at its CR, so this LF stands alone.
            return ProxyParse::Invalid("PROXY v1 line ends with a bare LF");
        }
        if b == b'\r' {
            if i + 2 > V1_MAX_LEN {
                return ProxyParse::Invalid(V1_TOO_LONG);
            }
            return match buf.get(i + 1) {
                Some(b'\n') => match v1_line(buf.get(V1_SIGNATURE.len()..i).unwrap_or_default()) {
                    Ok(addresses) => ProxyParse::Header(ProxyHeader { consumed: i + 2, addresses, tlvs: Vec::new() }),
                    Err(why) => ProxyParse::Invalid(why),
                },
                Some(_) => ProxyParse::Invalid("PROXY v1 line has a CR not followed by LF"),
                None => ProxyParse::NeedMore,
            };
        }
    }
    if buf.len() >= V1_MAX_LEN { ProxyParse::Invalid(V1_TOO_LONG) } else { ProxyParse::NeedMore }
}

/// The fields after `PROXY ` up to (not including) the CRLF.
fn v1_line(fields: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, &'static str> {
    // "the receiver must ignore anything presented before the CRLF" after UNKNOWN.
    if fields == V1_UNKNOWN || fields.strip_prefix(V1_UNKNOWN).is_some_and(|rest| rest.starts_with(b" ")) {
        return Ok(None);
    }
    let mut parts = fields.split(|&b| b == b' ');
    let (Some(family), Some(src), Some(dst), Some(src_port), Some(dst_port), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("PROXY v1 line needs a protocol, two addresses and two ports separated by single spaces");
    };
    let (src, dst) = match family {
        b"TCP4" => {
            let v4 = |field| parse_text::<Ipv4Addr>(field).map(IpAddr::V4);
            v4(src).zip(v4(dst)).ok_or("PROXY v1 TCP4 address is not a valid IPv4 address")?
        }
        b"TCP6" => {
            let v6 = |field| parse_text::<Ipv6Addr>(field).map(IpAddr::V6);
            v6(src).zip(v6(dst)).ok_or("PROXY v1 TCP6 address is not a valid IPv6 address")?
        }
        _ => return Err("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN"),
    };
    let (Some(src_port), Some(dst_port)) = (parse_port(src_port), parse_port(dst_port)) else {
        return Err("PROXY v1 port must be a decimal number 0-65535 without sign or leading zeros");
    };
    unicast_pair(SocketAddr::new(src, src_port), SocketAddr::new(dst, dst_port)).map(Some)
}

fn parse_text<T: std::str::FromStr>(field: &[u8]) -> Option<T> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// 1 to 5 decimal digits, no leading zero except for "0" itself, at most 65535.
fn parse_port(field: &[u8]) -> Option<u16> {
    if field.is_empty() || field.len() > 5 || (field.len() > 1 && field.first() == Some(&b'0')) {
        return None;
    }
    let mut value = 0u32;
    for &b in field {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(b - b'0');
    }
    u16::try_from(value).ok()
}

/// How a v2 PROXY command lays out its address block.
#[derive(Clone, Copy)]
enum V2Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

impl V2Family {
    /// The family/transport bytes the spec lists; every other value "must be rejected as invalid by receivers".
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x00 => Some(V2Family::Unspec),
            0x11 | 0x12 => Some(V2Family::Inet),
            0x21 | 0x22 => Some(V2Family::Inet6),
            0x31 | 0x32 => Some(V2Family::Unix),
            _ => None,
        }
    }

    fn address_len(self) -> usize {
        match self {
            V2Family::Unspec => 0,
            V2Family::Inet => 12,
            V2Family::Inet6 => 36,
            V2Family::Unix => 216,
        }
    }
}

/// `buf` starts with the full v2 signature.
fn parse_v2(buf: &[u8]) -> ProxyParse {
    // Judge each fixed byte as soon as it arrives, so a bad header is refused without waiting for its length.
    let Some(&version_command) = buf.get(V2_SIGNATURE.len()) else {
        return ProxyParse::NeedMore;
    };
    if version_command >> 4 != V2_VERSION {
        return ProxyParse::Invalid("PROXY v2 header has an unsupported version");
    }
    let command = version_command & 0x0f;
    if command != V2_LOCAL && command != V2_PROXY {
        return ProxyParse::Invalid("PROXY v2 header has an unsupported command");
    }
    let Some(&family_byte) = buf.get(13) else {
        return ProxyParse::NeedMore;
    };
    // LOCAL: "the receiver must ... discard the protocol block including the family which is ignored".
    let family = if command == V2_LOCAL {
        None
    } else {
        match V2Family::from_byte(family_byte) {
            Some(family) => Some(family),
            None => return ProxyParse::Invalid("PROXY v2 header has an unsupported address family or transport"),
        }
    };
    let (Some(&len_hi), Some(&len_lo)) = (buf.get(14), buf.get(15)) else {
        return ProxyParse::NeedMore;
    };
    let total = V2_HEADER_LEN + usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let address_len = family.map_or(0, V2Family::address_len);
    if total < V2_HEADER_LEN + address_len {
        return ProxyParse::Invalid("PROXY v2 header is too short for its address family");
    }
    let Some(block) = buf.get(V2_HEADER_LEN..V2_HEADER_LEN + address_len) else {
        return ProxyParse::NeedMore;
    };
    let addresses = match family.map(|f| v2_addresses(f, block)) {
        Some(Some(Ok(pair))) => Some(pair),
        Some(Some(Err(why))) => return ProxyParse::Invalid(why),
        Some(None) | None => None,
    };
    let Some(extensions) = buf.get(V2_HEADER_LEN + address_len..total) else {
        return ProxyParse::NeedMore;
    };
    // TLVs only follow a known address layout, and LOCAL's are ignored like the rest of its block (Envoy).
    let tlvs = match family {
        Some(V2Family::Inet | V2Family::Inet6 | V2Family::Unix) => match parse_tlvs(extensions) {
            Ok(tlvs) => tlvs,
            Err(why) => return ProxyParse::Invalid(why),
        },
        Some(V2Family::Unspec) | None => Vec::new(),
    };
    ProxyParse::Header(ProxyHeader { consumed: total, addresses, tlvs })
}

/// Source and destination from a complete address block; None for the families that carry no IP addresses.
fn v2_addresses(family: V2Family, block: &[u8]) -> Option<Result<(SocketAddr, SocketAddr), &'static str>> {
    let (src, dst, ports) = match family {
        V2Family::Inet => {
            let src = Ipv4Addr::from(array::<4>(block, 0)?);
            let dst = Ipv4Addr::from(array::<4>(block, 4)?);
            (IpAddr::V4(src), IpAddr::V4(dst), 8)
        }
        V2Family::Inet6 => {
            let src = Ipv6Addr::from(array::<16>(block, 0)?);
            let dst = Ipv6Addr::from(array::<16>(block, 16)?);
            (IpAddr::V6(src), IpAddr::V6(dst), 32)
        }
        V2Family::Unspec | V2Family::Unix => return None,
    };
    let src_port = u16::from_be_bytes(array::<2>(block, ports)?);
    let dst_port = u16::from_be_bytes(array::<2>(block, ports + 2)?);
    Some(unicast_pair(SocketAddr::new(src, src_port), SocketAddr::new(dst, dst_port)))
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Envoy refuses PROXY addresses that are not unicast (any, broadcast, multicast).
fn unicast_pair(src: SocketAddr, dst: SocketAddr) -> Result<(SocketAddr, SocketAddr), &'static str> {
    let unicast = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast() && !v4.is_multicast(),
        IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_multicast(),
    };
    if unicast(src.ip()) && unicast(dst.ip()) { Ok((src, dst)) } else { Err(NOT_UNICAST) }
}

/// Type (1 byte), length (2 bytes, big-endian), value; the TLVs must exactly fill `bytes`.
fn parse_tlvs(mut bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, &'static str> {
    let mut tlvs = Vec::new();
    while let Some((&tlv_type, after_type)) = bytes.split_first() {
        let [len_hi, len_lo, after_len @ ..] = after_type else {
            return Err("PROXY v2 TLV header is truncated");
        };
        let len = usize::from(u16::from_be_bytes([*len_hi, *len_lo]));
        let Some((value, rest)) = after_len.split_at_checked(len) else {
            return Err("PROXY v2 TLV value runs past the header");
        };
        tlvs.push((tlv_type, value.to_vec()));
        bytes = rest;
    }
    Ok(tlvs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::listener::filters::test_rng::Rng;

    fn header(consumed: usize, addresses: Option<(&str, &str)>, tlvs: &[(u8, &[u8])]) -> ProxyParse {
        ProxyParse::Header(ProxyHeader {
            consumed,
            addresses: addresses.map(|(s, d)| (s.parse().unwrap(), d.parse().unwrap())),
            tlvs: tlvs.iter().map(|&(t, v)| (t, v.to_vec())).collect(),
        })
    }

    /// Every proper prefix needs more; the whole gives `expected`, also when payload follows.
    fn assert_complete(bytes: &[u8], expected: &ProxyParse) {
        for n in 0..bytes.len() {
            assert_eq!(parse(&bytes[..n]), ProxyParse::NeedMore, "prefix of {n}: {:?}", &bytes[..n]);
        }
        assert_eq!(&parse(bytes), expected, "{:?}", String::from_utf8_lossy(bytes));
        let with_payload = [bytes, b"GET / HTTP/1.1\r\n\r\n\x00\r\n"].concat();
        assert_eq!(&parse(&with_payload), expected);
    }

    fn invalid(bytes: &[u8]) {
        assert!(
            matches!(parse(bytes), ProxyParse::Invalid(_)),
            "{:?}: {:?}",
            String::from_utf8_lossy(bytes),
            parse(bytes)
        );
    }

    #[test]
    fn v1_tcp4() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        assert_complete(line, &header(line.len(), Some(("192.168.0.1:56324", "192.168.0.11:443")), &[]));
        let edges = b"PROXY TCP4 255.255.255.254 1.0.0.0 0 65535\r\n";
        assert_complete(edges, &header(edges.len(), Some(("255.255.255.254:0", "1.0.0.0:65535")), &[]));
    }

    #[test]
    fn v1_tcp6() {
        let full = "2001:0db8:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(line.len(), 104);
        let addr = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        assert_complete(line.as_bytes(), &header(104, Some((addr, addr)), &[]));
        let short = b"PROXY TCP6 2001:db8::1 ::FFFF:10.0.0.1 1 2\r\n";
        assert_complete(short, &header(short.len(), Some(("[2001:db8::1]:1", "[::ffff:10.0.0.1]:2")), &[]));
    }

    #[test]
    fn v1_unknown() {
        assert_complete(b"PROXY UNKNOWN\r\n", &header(15, None, &[]));
        let longest = format!("PROXY UNKNOWN {0} {0} 65535 65535\r\n", "ffff:".repeat(7) + "ffff");
        assert_eq!(longest.len(), V1_MAX_LEN);
        assert_complete(longest.as_bytes(), &header(V1_MAX_LEN, None, &[]));
        assert_complete(b"PROXY UNKNOWN anything \x01 at all\r\n", &header(33, None, &[]));
        invalid(b"PROXY UNKNOWNX\r\n");
    }

    #[test]
    fn v1_length_limit() {
        let too_long = format!("PROXY UNKNOWN {0} {0} 65535 655350\r\n", "ffff:".repeat(7) + "ffff");
        assert_eq!(too_long.len(), V1_MAX_LEN + 1);
        assert_eq!(parse(&too_long.as_bytes()[..V1_MAX_LEN - 1]), ProxyParse::NeedMore);
        invalid(&too_long.as_bytes()[..V1_MAX_LEN]);
        invalid(too_long.as_bytes());
        let no_crlf = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(parse(&no_crlf[..V1_MAX_LEN - 1]), ProxyParse::NeedMore);
        invalid(&no_crlf[..V1_MAX_LEN]);
    }

    #[test]
    fn v1_malformed_fields() {
        for line in [
            "PROXY TCP4 ::1 ::1 1 2\r\n",
            "PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP4 256.1.1.1 1.1.1.1 1 2\r\n",
            "PROXY TCP4 01.2.3.4 1.1.1.1 1 2\r\n",
            "PROXY TCP4 1.2.3 1.1.1.1 1 2\r\n",
            "PROXY TCP6 [::1] ::2 1 2\r\n",
            "PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 80x 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 123456 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY \r\n",
            "PROXY TCP4\r\n",
            "PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 \u{0663}\r\n",
        ] {
            invalid(line.as_bytes());
        }
    }

    #[test]
    fn addresses_must_be_unicast() {
        for line in [
            "PROXY TCP4 0.0.0.0 5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3.4 255.255.255.255 1 2\r\n",
            "PROXY TCP4 224.0.0.1 5.6.7.8 1 2\r\n",
            "PROXY TCP6 :: ::1 1 2\r\n",
            "PROXY TCP6 ::1 ff02::1 1 2\r\n",
        ] {
            assert_eq!(parse(line.as_bytes()), ProxyParse::Invalid(NOT_UNICAST), "{line}");
        }
        assert_eq!(parse(&v2(0x21, 0x11, &v4_block([0, 0, 0, 0], [1, 1, 1, 1]))), ProxyParse::Invalid(NOT_UNICAST));
    }

    #[test]
    fn not_proxy() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROX ",
            b"PROXY\t",
            b"proxy ",
            b"\x16\x03\x01\x02\x00\x01",
            b"\r\n\r\n\x01",
            b"\r\r",
            b"SSH-2.0-x\r\n",
            b"\x00",
        ] {
            assert_eq!(parse(bytes), ProxyParse::NotProxy, "{bytes:?}");
        }
        for bytes in [&b""[..], b"P", b"PROX", b"PROXY", b"\r", b"\r\n\r\n\0\r\nQUI"] {
            assert_eq!(parse(bytes), ProxyParse::NeedMore, "{bytes:?}");
        }
    }

    fn v2(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend([version_command, family]);
        bytes.extend(u16::try_from(block.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(block);
        bytes
    }

    fn v4_block(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        [&src[..], &dst, &56324u16.to_be_bytes(), &443u16.to_be_bytes()].concat()
    }

    fn tlv(tlv_type: u8, value: &[u8]) -> Vec<u8> {
        [&[tlv_type][..], &u16::try_from(value.len()).unwrap().to_be_bytes(), value].concat()
    }

    #[test]
    fn v2_tcp4_with_tlvs() {
        let block = [
            v4_block([192, 168, 0, 1], [10, 0, 0, 2]),
            tlv(0x01, b"h2"),
            tlv(0x02, b"example.com"),
            tlv(0x04, b""),
            tlv(0xe0, &[0xff; 300]),
        ]
        .concat();
        let bytes = v2(0x21, 0x11, &block);
        let tlvs: [(u8, &[u8]); 4] = [(1, b"h2"), (2, b"example.com"), (4, b""), (0xe0, &[0xff; 300])];
        assert_complete(&bytes, &header(16 + block.len(), Some(("192.168.0.1:56324", "10.0.0.2:443")), &tlvs));
    }

    #[test]
    fn v2_udp6() {
        let src = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        let dst = "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().octets();
        let block = [&src[..], &dst, &[0, 53], &[0x13, 0x88]].concat();
        let bytes = v2(0x21, 0x22, &block);
        assert_complete(&bytes, &header(52, Some(("[2001:db8::7]:53", "[::ffff:10.1.2.3]:5000")), &[]));
    }

    #[test]
    fn v2_local_ignores_its_block() {
        assert_complete(&v2(0x20, 0x00, &[]), &header(16, None, &[]));
        // Addresses, junk and unparseable TLVs behind LOCAL are skipped, whatever the family byte says.
        let junk = [v4_block([0, 0, 0, 0], [255, 255, 255, 255]), vec![0x01, 0xff]].concat();
        assert_complete(&v2(0x20, 0x11, &junk), &header(16 + junk.len(), None, &[]));
        assert_complete(&v2(0x20, 0x77, &[1, 2, 3]), &header(19, None, &[]));
    }

    #[test]
    fn v2_families_without_addresses() {
        assert_complete(&v2(0x21, 0x00, &[]), &header(16, None, &[]));
        assert_complete(&v2(0x21, 0x00, &[9; 5]), &header(21, None, &[]));
        let unix = [vec![b'/'; 216], tlv(0x05, b"id-1")].concat();
        assert_complete(&v2(0x21, 0x31, &unix), &header(16 + unix.len(), None, &[(5, b"id-1")]));
        assert_complete(&v2(0x21, 0x32, &[0; 216]), &header(232, None, &[]));
        invalid(&v2(0x21, 0x31, &[0; 215]));
    }

    #[test]
    fn v2_malformed() {
        let good = v4_block([1, 2, 3, 4], [5, 6, 7, 8]);
        invalid(&v2(0x11, 0x11, &good));
        invalid(&v2(0x31, 0x11, &good));
        invalid(&v2(0x22, 0x11, &good));
        invalid(&v2(0x2f, 0x11, &good));
        for family in [0x01, 0x02, 0x10, 0x13, 0x20, 0x30, 0x41, 0xff] {
            invalid(&v2(0x21, family, &good));
        }
        invalid(&v2(0x21, 0x11, &good[..11]));
        invalid(&v2(0x21, 0x21, &[0; 35]));
        invalid(&v2(0x21, 0x11, &[good.clone(), vec![0x01]].concat()));
        invalid(&v2(0x21, 0x11, &[good.clone(), vec![0x01, 0x00]].concat()));
        invalid(&v2(0x21, 0x11, &[good.clone(), vec![0x01, 0x00, 0x05, b'a']].concat()));
        invalid(&v2(0x21, 0x11, &[good.clone(), tlv(1, b"ok"), vec![0x02, 0x00, 0x03]].concat()));
        // Refused as soon as the offending byte is in, not after the whole header.
        invalid(&v2(0x11, 0x11, &good)[..13]);
        invalid(&v2(0x21, 0x41, &good)[..14]);
        invalid(&v2(0x21, 0x11, &[0; 4])[..16]);
    }

    #[test]
    fn v2_largest_header() {
        let block = [v4_block([1, 2, 3, 4], [5, 6, 7, 8]), tlv(0x04, &vec![0; 65_535 - 12 - 3])].concat();
        let bytes = v2(0x21, 0x11, &block);
        assert_eq!(bytes.len(), 16 + 65_535);
        assert_eq!(parse(&bytes[..bytes.len() - 1]), ProxyParse::NeedMore);
        let ProxyParse::Header(h) = parse(&bytes) else { panic!("not a header") };
        assert_eq!((h.consumed, h.tlvs.len()), (bytes.len(), 1));
    }

    #[test]
    fn random_and_mutated_inputs_are_prefix_consistent() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let seeds = [
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(0x21, 0x11, &[v4_block([1, 2, 3, 4], [5, 6, 7, 8]), tlv(1, b"h2"), tlv(2, b"a.b")].concat()),
            v2(0x21, 0x21, &[0x20; 40]),
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x31, &[0x41; 220]),
        ];
        let alphabet = b"PROXY TCP46UNKOW0123456789abcdef.:\r\n\0";
        for i in 0..300_000 {
            let mut bytes = seeds[rng.below(seeds.len())].clone();
            match i % 3 {
                0 => {
                    for _ in 0..=rng.below(3) {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                }
                1 => {
                    let at = rng.below(bytes.len());
                    bytes[at] = alphabet[rng.below(alphabet.len())];
                    bytes.truncate(rng.below(bytes.len() + 1));
                }
                _ => {
                    let len = rng.below(40);
                    bytes = (0..len).map(|_| rng.next() as u8).collect();
                    if rng.below(2) == 0 {
                        bytes = [&V2_SIGNATURE[..], &bytes].concat();
                    }
                }
            }
            let verdict = parse(&bytes);
            if let ProxyParse::Header(h) = &verdict {
                assert!(h.consumed <= bytes.len());
                assert!(h.tlvs.iter().map(|(_, v)| v.len() + 3).sum::<usize>() <= h.consumed);
            }
            let early = parse(&bytes[..rng.below(bytes.len() + 1)]);
            if early != ProxyParse::NeedMore {
                assert_eq!(early, verdict, "{bytes:?}");
            }
        }
    }

    #[test]
    fn every_truncation_of_mutated_headers_is_consistent() {
        let mut rng = Rng(7);
        let seed = v2(0x21, 0x11, &[v4_block([1, 2, 3, 4], [5, 6, 7, 8]), tlv(1, b"h2"), tlv(2, b"a.b")].concat());
        let line = b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n".to_vec();
        for i in 0..400 {
            let mut bytes = if i % 2 == 0 { seed.clone() } else { line.clone() };
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 << rng.below(8);
            let verdict = parse(&bytes);
            for cut in 0..bytes.len() {
                let early = parse(&bytes[..cut]);
                if early != ProxyParse::NeedMore {
                    assert_eq!(early, verdict, "{bytes:?} cut at {cut}");
                }
            }
        }
    }
}
