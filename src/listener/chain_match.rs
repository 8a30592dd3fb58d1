//! Filter chain selection: which of a listener's `filter_chains` a connection uses, with Envoy's
//! `filter_chain_match` semantics (validation, overlap rejection, most specific branch wins, no backtracking).
//!
//! Three steps, as everywhere in xds-proxy: the proto `FilterChainMatch` is validated into a [`ChainMatch`]
//! (errors carry the field path), a listener's matches are compiled once into a [`ChainIndex`], and each accepted
//! connection is matched with [`ChainIndex::select`] after the listener filters ran. The module is pure: no IO, no
//! clock, no other project module, so every rule is unit-tested from Envoy YAML below.
//!
//! The index copies Envoy's `FilterChainManagerImpl` (source/common/listener_manager/filter_chain_manager_impl.cc):
//! a tree with one level per criterion, in Envoy's order
//!
//! destination_port → prefix_ranges → server_names → transport_protocol → application_protocols →
//! direct_source_prefix_ranges → source_type → source_prefix_ranges → source_ports,
//!
//! where each chain is expanded into the cross product of its lists and every leaf may be claimed by one chain
//! only. At each level the most specific branch that matches the connection is taken and the search never comes
//! back up (listener_components.proto: "filter chains which most specifically match the attributes continue to the
//! next step"); a dead end means "no chain", and the caller then uses `default_filter_chain` or closes the
//! connection. Every level is a hash lookup, a bounded walk over the connection's own values (SNI suffixes, ALPN
//! list) or one lookup per distinct prefix length, so selection cost does not grow with the number of chains.

use std::borrow::{Borrow, Cow};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
use envoy_types::pb::envoy::config::listener::v3::filter_chain_match::ConnectionSourceType;

// ---------------------------------------------------------------------------------------------------------------
// CIDR
// ---------------------------------------------------------------------------------------------------------------

/// An IP prefix. The host bits are cleared on construction, as Envoy's `CidrRange::create` does, so `10.1.2.3/8`
/// and `10.0.0.0/8` are the same range and the same index key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// `0.0.0.0/0`: what an empty IPv4 prefix list stands for.
    pub const ANY_V4: Cidr = Cidr { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), len: 0 };
    /// `::/0`: what an empty IPv6 prefix list stands for.
    pub const ANY_V6: Cidr = Cidr { addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), len: 0 };

    /// Masks `addr` to `len` bits. A length past the family's width is clamped to it (32 or 128), as Envoy's
    /// `truncateIpAddressAndLength` does; [`ChainMatch::from_proto`] rejects lengths above 128 before this.
    pub fn new(addr: IpAddr, len: u8) -> Cidr {
        match addr {
            IpAddr::V4(a) => {
                let len = len.min(32);
                Cidr { addr: IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & mask_v4(len))), len }
            }
            IpAddr::V6(a) => {
                let len = len.min(128);
                Cidr { addr: IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & mask_v6(len))), len }
            }
        }
    }

    /// The masked network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is inside the range. Families never mix: `0.0.0.0/0` does not contain an IPv6 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => ip.to_bits() & mask_v4(self.len) == net.to_bits(),
            (IpAddr::V6(net), IpAddr::V6(ip)) => ip.to_bits() & mask_v6(self.len) == net.to_bits(),
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask_v4(len: u8) -> u32 {
    match len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

fn mask_v6(len: u8) -> u128 {
    match len {
        0 => 0,
        n => u128::MAX << (128 - u32::from(n.min(128))),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Validated match config
// ---------------------------------------------------------------------------------------------------------------

/// `FilterChainMatch.source_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SourceType {
    /// Any connection source (the proto default).
    #[default]
    Any,
    /// The source IP is the destination IP, or the loopback address (Envoy's `isSameIpOrLoopback`).
    SameIpOrLoopback,
    /// Everything that is not `SameIpOrLoopback`.
    External,
}

impl fmt::Display for SourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceType::Any => "ANY",
            SourceType::SameIpOrLoopback => "SAME_IP_OR_LOOPBACK",
            SourceType::External => "EXTERNAL",
        })
    }
}

/// A rejected `FilterChainMatch` field. `path` is relative to the `FilterChainMatch` (`server_names[0]`,
/// `prefix_ranges[1].prefix_len`); the listener code prefixes `filter_chains[N].filter_chain_match.` and the
/// listener name, and the whole line becomes the NACK text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct MatchError {
    pub path: String,
    pub message: String,
}

impl MatchError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        MatchError { path: path.into(), message: message.into() }
    }
}

/// A validated `FilterChainMatch`. Empty lists and `None` mean "not constrained". `Default` is the empty match,
/// which is what a filter chain without `filter_chain_match` has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ChainMatch {
    destination_port: Option<u16>,
    prefix_ranges: Vec<Cidr>,
    /// Lower-cased; exact names and `*.suffix` wildcards.
    server_names: Vec<String>,
    transport_protocol: Option<String>,
    application_protocols: Vec<String>,
    direct_source_prefix_ranges: Vec<Cidr>,
    source_type: SourceType,
    source_prefix_ranges: Vec<Cidr>,
    source_ports: Vec<u16>,
}

impl ChainMatch {
    /// Validates every field of the proto. Rejected, as Envoy (or its proto validation) rejects them:
    /// `address_suffix`/`suffix_len` (not implemented in Envoy either), partial wildcards in `server_names`
    /// (only a leading `*.` is valid; `*` alone too is refused), malformed CIDR addresses, `prefix_len` above 128,
    /// ports outside 1..=65535 and unknown `source_type` values.
    pub fn from_proto(m: &FilterChainMatch) -> Result<Self, MatchError> {
        if !m.address_suffix.is_empty() {
            return Err(MatchError::new("address_suffix", "not supported"));
        }
        if m.suffix_len.is_some() {
            return Err(MatchError::new("suffix_len", "not supported"));
        }
        let destination_port = match &m.destination_port {
            None => None,
            Some(p) => Some(port("destination_port", p.value)?),
        };
        let mut server_names = Vec::with_capacity(m.server_names.len());
        for (i, name) in m.server_names.iter().enumerate() {
            // Envoy's test: any '*' that is not part of a leading "*." (so "*", "*w.example.com", "a.*.com").
            if name.contains('*') && !name.starts_with("*.") {
                return Err(MatchError::new(format!("server_names[{i}]"), "partial wildcards are not supported"));
            }
            server_names.push(name.to_ascii_lowercase());
        }
        let source_type = match ConnectionSourceType::try_from(m.source_type) {
            Ok(ConnectionSourceType::Any) => SourceType::Any,
            Ok(ConnectionSourceType::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
            Ok(ConnectionSourceType::External) => SourceType::External,
            Err(_) => return Err(MatchError::new("source_type", format!("unknown value {}", m.source_type))),
        };
        let source_ports = m
            .source_ports
            .iter()
            .enumerate()
            .map(|(i, &p)| port(&format!("source_ports[{i}]"), p))
            .collect::<Result<_, _>>()?;
        Ok(ChainMatch {
            destination_port,
            prefix_ranges: cidrs("prefix_ranges", &m.prefix_ranges)?,
            server_names,
            transport_protocol: Some(m.transport_protocol.clone()).filter(|t| !t.is_empty()),
            application_protocols: m.application_protocols.clone(),
            direct_source_prefix_ranges: cidrs("direct_source_prefix_ranges", &m.direct_source_prefix_ranges)?,
            source_type,
            source_prefix_ranges: cidrs("source_prefix_ranges", &m.source_prefix_ranges)?,
            source_ports,
        })
    }

    pub fn destination_port(&self) -> Option<u16> {
        self.destination_port
    }

    pub fn prefix_ranges(&self) -> &[Cidr] {
        &self.prefix_ranges
    }

    pub fn server_names(&self) -> &[String] {
        &self.server_names
    }

    pub fn transport_protocol(&self) -> Option<&str> {
        self.transport_protocol.as_deref()
    }

    pub fn application_protocols(&self) -> &[String] {
        &self.application_protocols
    }

    pub fn direct_source_prefix_ranges(&self) -> &[Cidr] {
        &self.direct_source_prefix_ranges
    }

    pub fn source_type(&self) -> SourceType {
        self.source_type
    }

    pub fn source_prefix_ranges(&self) -> &[Cidr] {
        &self.source_prefix_ranges
    }

    pub fn source_ports(&self) -> &[u16] {
        &self.source_ports
    }
}

impl TryFrom<&FilterChainMatch> for ChainMatch {
    type Error = MatchError;

    fn try_from(m: &FilterChainMatch) -> Result<Self, MatchError> {
        ChainMatch::from_proto(m)
    }
}

/// The proto's `uint32 = {gte: 1, lte: 65535}` rule, shared by `destination_port` and `source_ports`.
fn port(path: &str, value: u32) -> Result<u16, MatchError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(MatchError::new(path, format!("port must be between 1 and 65535, got {value}"))),
    }
}

/// Envoy's `CidrRange` list, each range masked; errors name `field[i]` and the bad part.
pub fn cidrs(field: &str, ranges: &[CidrRange]) -> Result<Vec<Cidr>, MatchError> {
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let addr: IpAddr = r.address_prefix.parse().map_err(|_| {
                MatchError::new(
                    format!("{field}[{i}].address_prefix"),
                    format!("malformed IP address: {:?}", r.address_prefix),
                )
            })?;
            // Unset means 0 (the proto's documented default). Above 128 is refused by the proto's validation;
            // an IPv4 length from 33 to 128 is accepted and clamped to 32, as Envoy's CidrRange::create does.
            let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
            let len = u8::try_from(len).ok().filter(|&l| l <= 128).ok_or_else(|| {
                MatchError::new(
                    format!("{field}[{i}].prefix_len"),
                    format!("prefix length {len} is too long (at most 128)"),
                )
            })?;
            Ok(Cidr::new(addr, len))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Connection attributes
// ---------------------------------------------------------------------------------------------------------------

/// What is known about a connection when its chain is chosen, after the listener filters ran.
#[derive(Debug, Clone, Copy)]
pub struct ConnAttrs<'a> {
    /// The local address, or the original destination once `original_dst` restored it.
    pub destination: SocketAddr,
    /// The peer address, or the one a PROXY protocol header carried (Envoy's `remoteAddress`).
    pub source: SocketAddr,
    /// The address of the directly connected peer, whatever PROXY protocol said (`directRemoteAddress`).
    pub direct_source: IpAddr,
    /// SNI from tls_inspector. Compared lower-cased; `None` and `Some("")` both mean "no SNI".
    pub server_name: Option<&'a str>,
    /// `tls` from tls_inspector; empty means nothing was detected and is read as `raw_buffer`, the value
    /// Envoy's ActiveTcpSocket sets before matching.
    pub transport_protocol: &'a str,
    /// ALPN from tls_inspector or http_inspector, in the client's order.
    pub application_protocols: &'a [String],
}

// ---------------------------------------------------------------------------------------------------------------
// Index
// ---------------------------------------------------------------------------------------------------------------

/// Why a listener's set of matches was refused. The message names the chains by their index in
/// `filter_chains`; the listener code prefixes the listener name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Two chains have equal matches. Envoy compares the `FilterChainMatch` protos before expanding them; this
    /// compares the validated matches, so names differing only in case and unmasked CIDRs count as equal too
    /// (Envoy refuses those as overlapping instead).
    #[error(
        "multiple filter chains with the same matching rules are defined: filter_chains[{second}] has the same \
         matching rules defined as filter_chains[{first}]"
    )]
    SameRules { first: usize, second: usize },
    /// A connection could match both chains: once expanded into the cross product of their lists, both claim
    /// the same leaf (`rule`). `first == second` when one chain lists the same value twice.
    #[error(
        "multiple filter chains with overlapping matching rules are defined: {}",
        overlap_detail(*first, *second, rule)
    )]
    Overlap { first: usize, second: usize, rule: String },
}

impl IndexError {
    /// The chain whose insertion failed (the later one), for the field path of the NACK.
    pub fn chain(&self) -> usize {
        match self {
            IndexError::SameRules { second, .. } | IndexError::Overlap { second, .. } => *second,
        }
    }
}

fn overlap_detail(first: usize, second: usize, rule: &str) -> String {
    if first == second {
        format!("filter_chains[{first}] lists the same match twice ({rule})")
    } else {
        format!("filter_chains[{first}] and filter_chains[{second}] both match {rule}")
    }
}

/// A listener's filter chain matches compiled into Envoy's lookup tree. Immutable once built; shared by every
/// worker. `select` neither allocates nor locks.
#[derive(Debug, Default)]
pub struct ChainIndex {
    root: PortLevel,
}

// One type per level of the tree. `ExactOrAny::any` is the branch of chains that leave the criterion empty
// (Envoy's "" key, or port 0); `IpTable` is a longest-prefix level, where chains with an empty list have a
// branch of their own.
type PortLevel = ExactOrAny<u16, IpTable<NameLevel>>;
/// Exact names and, under the key `.suffix`, `*.suffix` wildcards share one map, as in Envoy.
type NameLevel = ExactOrAny<Box<str>, TransportLevel>;
type TransportLevel = ExactOrAny<Box<str>, AlpnLevel>;
type AlpnLevel = ExactOrAny<Box<str>, IpTable<SourceTypeLevel>>;
type SourcePortLevel = ExactOrAny<u16, usize>;

#[derive(Debug)]
struct ExactOrAny<K, V> {
    exact: HashMap<K, V>,
    any: Option<V>,
}

impl<K, V> Default for ExactOrAny<K, V> {
    fn default() -> Self {
        ExactOrAny { exact: HashMap::new(), any: None }
    }
}

impl<K: Eq + Hash, V> ExactOrAny<K, V> {
    /// The exact branch for `key` if there is one, else the branch of chains that left the criterion empty.
    /// The bool says which (true: exact).
    fn pick<Q>(&self, key: &Q) -> Option<(&V, bool)>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self.exact.get(key) {
            Some(v) => Some((v, true)),
            None => self.any.as_ref().map(|v| (v, false)),
        }
    }
}

impl<K: Eq + Hash, V: Default> ExactOrAny<K, V> {
    fn slot(&mut self, key: Option<K>) -> &mut V {
        match key {
            Some(k) => self.exact.entry(k).or_default(),
            None => self.any.get_or_insert_with(V::default),
        }
    }
}

impl SourcePortLevel {
    /// Claims the leaf for `chain`; `Err(owner)` when another chain (or this one, through a repeated value)
    /// already did.
    fn claim(&mut self, key: Option<u16>, chain: usize) -> Result<(), usize> {
        let owner = match key {
            Some(port) => match self.exact.entry(port) {
                Entry::Occupied(e) => Some(*e.get()),
                Entry::Vacant(e) => {
                    e.insert(chain);
                    None
                }
            },
            None => match self.any {
                Some(owner) => Some(owner),
                None => {
                    self.any = Some(chain);
                    None
                }
            },
        };
        owner.map_or(Ok(()), Err)
    }
}

#[derive(Debug, Default)]
struct SourceTypeLevel {
    same_ip_or_loopback: Option<IpTable<SourcePortLevel>>,
    external: Option<IpTable<SourcePortLevel>>,
    any: Option<IpTable<SourcePortLevel>>,
}

impl SourceTypeLevel {
    fn slot(&mut self, source_type: SourceType) -> &mut IpTable<SourcePortLevel> {
        match source_type {
            SourceType::SameIpOrLoopback => &mut self.same_ip_or_loopback,
            SourceType::External => &mut self.external,
            SourceType::Any => &mut self.any,
        }
        .get_or_insert_with(IpTable::default)
    }
}

/// Longest-prefix match: one hash map per distinct prefix length, longest first, so a lookup costs at most one
/// probe per distinct length present (≤ 33 for IPv4, ≤ 129 for IPv6) however many prefixes there are. Envoy uses
/// an LC-trie; the result is the same.
///
/// Chains with an empty list live in `unlisted`, which matches every address of both families (Envoy files them
/// under 0.0.0.0/0 and ::/0) and ranks below every listed prefix. An explicitly listed 0.0.0.0/0 therefore wins
/// over an empty list for IPv4 addresses; Envoy accepts that configuration too (the map keys differ) but then holds
/// two equal prefixes in its trie, and which one a lookup returns is unspecified.
#[derive(Debug)]
struct IpTable<V> {
    v4: Vec<PrefixGroup<u32, V>>,
    v6: Vec<PrefixGroup<u128, V>>,
    unlisted: Option<V>,
}

impl<V> Default for IpTable<V> {
    fn default() -> Self {
        IpTable { v4: Vec::new(), v6: Vec::new(), unlisted: None }
    }
}

#[derive(Debug)]
struct PrefixGroup<K, V> {
    len: u8,
    entries: HashMap<K, V>,
}

impl<V> IpTable<V> {
    /// The branch for `ip`: the longest listed prefix that contains it, else the chains that list none (`None`
    /// as the prefix).
    fn longest(&self, ip: IpAddr) -> Option<(Option<Cidr>, &V)> {
        let listed = match ip {
            IpAddr::V4(ip) => {
                let bits = ip.to_bits();
                self.v4.iter().find_map(|g| {
                    let key = bits & mask_v4(g.len);
                    let value = g.entries.get(&key)?;
                    Some((Cidr { addr: IpAddr::V4(Ipv4Addr::from_bits(key)), len: g.len }, value))
                })
            }
            IpAddr::V6(ip) => {
                let bits = ip.to_bits();
                self.v6.iter().find_map(|g| {
                    let key = bits & mask_v6(g.len);
                    let value = g.entries.get(&key)?;
                    Some((Cidr { addr: IpAddr::V6(Ipv6Addr::from_bits(key)), len: g.len }, value))
                })
            }
        };
        match listed {
            Some((cidr, value)) => Some((Some(cidr), value)),
            None => self.unlisted.as_ref().map(|value| (None, value)),
        }
    }
}

impl<V: Default> IpTable<V> {
    /// The branch for a listed prefix, or for chains with an empty list (`None`).
    fn slot(&mut self, key: Option<Cidr>) -> &mut V {
        match key.map(|cidr| (cidr.addr, cidr.len)) {
            None => self.unlisted.get_or_insert_with(V::default),
            Some((IpAddr::V4(a), len)) => group_slot(&mut self.v4, len, a.to_bits()),
            Some((IpAddr::V6(a), len)) => group_slot(&mut self.v6, len, a.to_bits()),
        }
    }
}

fn group_slot<K: Eq + Hash, V: Default>(groups: &mut Vec<PrefixGroup<K, V>>, len: u8, key: K) -> &mut V {
    // Groups stay sorted longest first, so the first hit of a lookup is the longest prefix.
    let at = match groups.binary_search_by(|g| len.cmp(&g.len)) {
        Ok(at) => at,
        Err(at) => {
            groups.insert(at, PrefixGroup { len, entries: HashMap::new() });
            at
        }
    };
    groups[at].entries.entry(key).or_default()
}

/// `None` (the chains that list none) for an empty list, else each prefix.
fn ip_keys(list: &[Cidr]) -> Vec<Option<Cidr>> {
    if list.is_empty() { vec![None] } else { list.iter().copied().map(Some).collect() }
}

/// One element of a chain's expanded cross product: a path from the root to a leaf of the tree.
#[derive(Debug, Clone, Copy)]
struct Leaf<'a> {
    destination_port: Option<u16>,
    destination_ip: Option<Cidr>,
    /// Map key form: `example.com`, or `.example.com` for `*.example.com`.
    server_name: Option<&'a str>,
    transport_protocol: Option<&'a str>,
    application_protocol: Option<&'a str>,
    direct_source_ip: Option<Cidr>,
    source_type: SourceType,
    source_ip: Option<Cidr>,
    source_port: Option<u16>,
}

impl fmt::Display for Leaf<'_> {
    /// The constrained criteria only, in matching order: what an operator needs to find the overlap.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(p) = self.destination_port {
            parts.push(format!("destination_port {p}"));
        }
        let ip = |name: &str, key: Option<Cidr>| key.map(|cidr| format!("{name} {cidr}"));
        parts.extend(ip("prefix_ranges", self.destination_ip));
        if let Some(name) = self.server_name {
            let star = if name.starts_with('.') { "*" } else { "" };
            parts.push(format!("server_names {star}{name}"));
        }
        if let Some(t) = self.transport_protocol {
            parts.push(format!("transport_protocol {t}"));
        }
        if let Some(a) = self.application_protocol {
            parts.push(format!("application_protocols {a}"));
        }
        parts.extend(ip("direct_source_prefix_ranges", self.direct_source_ip));
        if self.source_type != SourceType::Any {
            parts.push(format!("source_type {}", self.source_type));
        }
        parts.extend(ip("source_prefix_ranges", self.source_ip));
        if let Some(p) = self.source_port {
            parts.push(format!("source_ports {p}"));
        }
        if parts.is_empty() { f.write_str("every connection (no criteria)") } else { f.write_str(&parts.join(", ")) }
    }
}

/// `None` (the "not constrained" branch) for an empty list, else each value. An empty string is filed under
/// "not constrained" too, exactly as Envoy's maps keyed by "" do.
fn str_keys(list: &[String]) -> Vec<Option<&str>> {
    if list.is_empty() { vec![None] } else { list.iter().map(|s| Some(s.as_str()).filter(|s| !s.is_empty())).collect() }
}

fn name_keys(list: &[String]) -> Vec<Option<&str>> {
    // "*.example.com" is stored as ".example.com", the suffix a lookup tries.
    str_keys(list).into_iter().map(|k| k.map(|name| name.strip_prefix('*').unwrap_or(name))).collect()
}

fn port_keys(list: &[u16]) -> Vec<Option<u16>> {
    if list.is_empty() { vec![None] } else { list.iter().copied().map(Some).collect() }
}

/// Envoy's expansion: the cross product of every list of the match.
fn leaves(m: &ChainMatch) -> Vec<Leaf<'_>> {
    let destination_ips = ip_keys(&m.prefix_ranges);
    let names = name_keys(&m.server_names);
    let alpns = str_keys(&m.application_protocols);
    let direct_ips = ip_keys(&m.direct_source_prefix_ranges);
    let source_ips = ip_keys(&m.source_prefix_ranges);
    let source_ports = port_keys(&m.source_ports);
    let mut out = Vec::new();
    for &destination_ip in &destination_ips {
        for &server_name in &names {
            for &application_protocol in &alpns {
                for &direct_source_ip in &direct_ips {
                    for &source_ip in &source_ips {
                        for &source_port in &source_ports {
                            out.push(Leaf {
                                destination_port: m.destination_port,
                                destination_ip,
                                server_name,
                                transport_protocol: m.transport_protocol.as_deref(),
                                application_protocol,
                                direct_source_ip,
                                source_type: m.source_type,
                                source_ip,
                                source_port,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

impl ChainIndex {
    /// Compiles a listener's matches; `matches[i]` belongs to `filter_chains[i]`. Refuses, like Envoy, two
    /// equal matches and any two chains (or one chain with a repeated value) whose expansions share a leaf:
    /// such a connection would have no single most specific chain.
    pub fn build(matches: &[ChainMatch]) -> Result<ChainIndex, IndexError> {
        let mut root = PortLevel::default();
        let mut seen: HashMap<&ChainMatch, usize> = HashMap::with_capacity(matches.len());
        for (chain, m) in matches.iter().enumerate() {
            match seen.entry(m) {
                Entry::Occupied(e) => return Err(IndexError::SameRules { first: *e.get(), second: chain }),
                Entry::Vacant(e) => {
                    e.insert(chain);
                }
            }
            for leaf in leaves(m) {
                insert(&mut root, &leaf, chain).map_err(|first| IndexError::Overlap {
                    first,
                    second: chain,
                    rule: leaf.to_string(),
                })?;
            }
        }
        Ok(ChainIndex { root })
    }

    /// The index of the chain for this connection, or `None`: the caller then uses `default_filter_chain`, or
    /// closes the connection and counts `no_filter_chain_match`. Allocation-free.
    pub fn select(&self, c: &ConnAttrs<'_>) -> Option<usize> {
        self.walk(c, &mut NoTrace)
    }

    /// `select`, step by step, for operators ("why did my connection take this chain").
    pub fn explain(&self, c: &ConnAttrs<'_>) -> Explanation {
        let mut recorder = Recorder::default();
        let chain = self.walk(c, &mut recorder);
        let steps = recorder
            .steps
            .into_iter()
            .map(|(criterion, taken)| Step { criterion, taken, connection: connection_value(c, criterion) })
            .collect();
        Explanation { steps, chain }
    }

    /// The one implementation of the matching order, shared by `select` (no tracing, optimised away) and
    /// `explain`.
    fn walk<T: Tracer>(&self, c: &ConnAttrs<'_>, t: &mut T) -> Option<usize> {
        // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; Envoy converts those to IPv4 addresses, so
        // IPv4 prefixes apply to them.
        let destination_ip = c.destination.ip().to_canonical();
        let source_ip = c.source.ip().to_canonical();
        let direct_source_ip = c.direct_source.to_canonical();

        // 1. destination_port: a chain naming the exact port hides the port-less chains for that port, even when
        //    nothing below the exact port matches (findFilterChain returns the default chain then).
        let port = c.destination.port();
        let ips = traced(t, Criterion::DestinationPort, self.root.pick(&port), || Taken::Exact(port.to_string()))?;

        // 2. prefix_ranges: longest prefix; no retry with a shorter prefix if the longer one dead-ends.
        let names = traced_ip(t, Criterion::PrefixRanges, ips.longest(destination_ip))?;

        // 3. server_names: exact, then wildcards from the longest suffix to the shortest, then no server_names.
        let transports = pick_server_name(names, c.server_name.unwrap_or_default(), t)?;

        // 4. transport_protocol: exact, then chains without one.
        let transport = if c.transport_protocol.is_empty() { "raw_buffer" } else { c.transport_protocol };
        let alpns =
            traced(t, Criterion::TransportProtocol, transports.pick(transport), || Taken::Exact(transport.to_owned()))?;

        // 5. application_protocols: the client's first value that some chain names, else chains without any.
        let direct_ips = pick_application_protocol(alpns, c.application_protocols, t)?;

        // 6. direct_source_prefix_ranges: longest prefix of the directly connected peer.
        let source_types = traced_ip(t, Criterion::DirectSourcePrefixRanges, direct_ips.longest(direct_source_ip))?;

        // 7. source_type: SAME_IP_OR_LOOPBACK or EXTERNAL (whichever the connection is) before ANY. Like Envoy,
        //    the address comparison only runs when some chain asks for a source type.
        let specific = source_types.same_ip_or_loopback.is_some() || source_types.external.is_some();
        let local = specific && is_same_ip_or_loopback(source_ip, destination_ip);
        let (source_ips, kind) = match (&source_types.same_ip_or_loopback, &source_types.external) {
            (Some(table), _) if local => (Some(table), SourceType::SameIpOrLoopback),
            (_, Some(table)) if !local => (Some(table), SourceType::External),
            _ => (source_types.any.as_ref(), SourceType::Any),
        };
        t.step(Criterion::SourceType, || source_ips.map(|_| Taken::SourceType(kind)));
        let source_ips = source_ips?;

        // 8. source_prefix_ranges: longest prefix of the (PROXY protocol restored) source.
        let ports = traced_ip(t, Criterion::SourcePrefixRanges, source_ips.longest(source_ip))?;

        // 9. source_ports: exact, then chains without source_ports.
        let source_port = c.source.port();
        let chain =
            traced(t, Criterion::SourcePorts, ports.pick(&source_port), || Taken::Exact(source_port.to_string()))?;
        Some(*chain)
    }
}

fn insert(root: &mut PortLevel, leaf: &Leaf<'_>, chain: usize) -> Result<(), usize> {
    root.slot(leaf.destination_port)
        .slot(leaf.destination_ip)
        .slot(leaf.server_name.map(Box::from))
        .slot(leaf.transport_protocol.map(Box::from))
        .slot(leaf.application_protocol.map(Box::from))
        .slot(leaf.direct_source_ip)
        .slot(leaf.source_type)
        .slot(leaf.source_ip)
        .claim(leaf.source_port, chain)
}

fn pick_server_name<'i, T: Tracer>(names: &'i NameLevel, sni: &str, t: &mut T) -> Option<&'i TransportLevel> {
    if !sni.is_empty() {
        let mut buf = [0u8; 256];
        let name = ascii_lowercase(sni, &mut buf);
        let name: &str = &name;
        if let Some(v) = names.exact.get(name) {
            t.step(Criterion::ServerNames, || Some(Taken::Exact(name.to_owned())));
            return Some(v);
        }
        // Envoy's walk: for www.example.com try .example.com, then .com (dots from index 1 on; a trailing dot
        // alone is never tried). Suffixes keep their dot, so example.com never matches *.example.com.
        let bytes = name.as_bytes();
        let mut dot = find_dot(bytes, 1);
        while let Some(at) = dot.filter(|&at| at + 1 < bytes.len()) {
            if let Some((suffix, v)) = name.get(at..).and_then(|suffix| Some((suffix, names.exact.get(suffix)?))) {
                t.step(Criterion::ServerNames, || Some(Taken::Wildcard(format!("*{suffix}"))));
                return Some(v);
            }
            dot = find_dot(bytes, at + 1);
        }
    }
    let any = names.any.as_ref();
    t.step(Criterion::ServerNames, || any.map(|_| Taken::Fallback));
    any
}

fn pick_application_protocol<'i, T: Tracer>(
    alpns: &'i AlpnLevel,
    offered: &[String],
    t: &mut T,
) -> Option<&'i IpTable<SourceTypeLevel>> {
    for alpn in offered {
        if let Some(v) = alpns.exact.get(alpn.as_str()) {
            t.step(Criterion::ApplicationProtocols, || Some(Taken::Exact(alpn.clone())));
            return Some(v);
        }
        // Envoy looks "" up in the map where chains without application_protocols live: an empty ALPN value
        // (which no client can send) reaches them at its position in the list.
        if alpn.is_empty() && alpns.any.is_some() {
            break;
        }
    }
    let any = alpns.any.as_ref();
    t.step(Criterion::ApplicationProtocols, || any.map(|_| Taken::Fallback));
    any
}

fn find_dot(bytes: &[u8], from: usize) -> Option<usize> {
    bytes.get(from..)?.iter().position(|&b| b == b'.').map(|i| i + from)
}

/// Lower-cases ASCII without allocating: borrowed when already lower-case, else through `buf` (SNI is at most
/// 255 bytes on the wire); only an over-long mixed-case name allocates.
fn ascii_lowercase<'b>(name: &'b str, buf: &'b mut [u8; 256]) -> Cow<'b, str> {
    if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(name);
    }
    match buf.get_mut(..name.len()) {
        Some(out) => {
            out.copy_from_slice(name.as_bytes());
            out.make_ascii_lowercase();
            // Lower-casing ASCII bytes keeps UTF-8 valid, so this never falls back.
            match std::str::from_utf8(out) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => Cow::Owned(name.to_ascii_lowercase()),
            }
        }
        None => Cow::Owned(name.to_ascii_lowercase()),
    }
}

/// Envoy's `isSameIpOrLoopback`: the source is exactly 127.0.0.1 or ::1 (not all of 127/8), or the source IP
/// equals the destination IP.
fn is_same_ip_or_loopback(source: IpAddr, destination: IpAddr) -> bool {
    source == IpAddr::V4(Ipv4Addr::LOCALHOST) || source == IpAddr::V6(Ipv6Addr::LOCALHOST) || source == destination
}

fn traced<'v, V, T: Tracer>(
    t: &mut T,
    criterion: Criterion,
    picked: Option<(&'v V, bool)>,
    exact: impl FnOnce() -> Taken,
) -> Option<&'v V> {
    match picked {
        Some((v, true)) => {
            t.step(criterion, || Some(exact()));
            Some(v)
        }
        Some((v, false)) => {
            t.step(criterion, || Some(Taken::Fallback));
            Some(v)
        }
        None => {
            t.step(criterion, || None);
            None
        }
    }
}

fn traced_ip<'v, V, T: Tracer>(t: &mut T, criterion: Criterion, found: Option<(Option<Cidr>, &'v V)>) -> Option<&'v V> {
    let taken = found.map(|(cidr, _)| cidr.map_or(Taken::Fallback, Taken::Prefix));
    t.step(criterion, || taken);
    found.map(|(_, value)| value)
}

// ---------------------------------------------------------------------------------------------------------------
// Tracing and explanations
// ---------------------------------------------------------------------------------------------------------------

/// Receives each step of the walk. `select` passes [`NoTrace`], whose empty body lets the compiler drop the
/// closures, so the production path pays nothing for `explain`.
trait Tracer {
    fn step(&mut self, criterion: Criterion, taken: impl FnOnce() -> Option<Taken>);
}

struct NoTrace;

impl Tracer for NoTrace {
    #[inline(always)]
    fn step(&mut self, _: Criterion, _: impl FnOnce() -> Option<Taken>) {}
}

#[derive(Default)]
struct Recorder {
    steps: Vec<(Criterion, Option<Taken>)>,
}

impl Tracer for Recorder {
    fn step(&mut self, criterion: Criterion, taken: impl FnOnce() -> Option<Taken>) {
        self.steps.push((criterion, taken()));
    }
}

/// A level of the tree, named by its `FilterChainMatch` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    DestinationPort,
    PrefixRanges,
    ServerNames,
    TransportProtocol,
    ApplicationProtocols,
    DirectSourcePrefixRanges,
    SourceType,
    SourcePrefixRanges,
    SourcePorts,
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Criterion::DestinationPort => "destination_port",
            Criterion::PrefixRanges => "prefix_ranges",
            Criterion::ServerNames => "server_names",
            Criterion::TransportProtocol => "transport_protocol",
            Criterion::ApplicationProtocols => "application_protocols",
            Criterion::DirectSourcePrefixRanges => "direct_source_prefix_ranges",
            Criterion::SourceType => "source_type",
            Criterion::SourcePrefixRanges => "source_prefix_ranges",
            Criterion::SourcePorts => "source_ports",
        })
    }
}

/// The branch a step took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// A value some chain lists, equal to the connection's (port, name, protocol).
    Exact(String),
    /// A `*.suffix` server name.
    Wildcard(String),
    /// The longest listed prefix containing the address.
    Prefix(Cidr),
    /// The source type branch (ANY when the connection's own type has no chains).
    SourceType(SourceType),
    /// No chain lists a matching value: the chains that leave the criterion empty.
    Fallback,
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Taken::Exact(v) => write!(f, "exact {v}"),
            Taken::Wildcard(w) => write!(f, "wildcard {w}"),
            Taken::Prefix(cidr) => write!(f, "longest prefix {cidr}"),
            Taken::SourceType(SourceType::Any) => f.write_str("ANY (fallback)"),
            Taken::SourceType(st) => write!(f, "{st}"),
            Taken::Fallback => f.write_str("none listed (fallback)"),
        }
    }
}

/// One level of the walk: the branch taken (`None`: no branch matched, and the search stops there) and the
/// connection's value for that criterion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub criterion: Criterion,
    pub taken: Option<Taken>,
    pub connection: String,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.taken {
            Some(taken) => write!(f, "{}: {taken} (connection: {})", self.criterion, self.connection),
            None => write!(
                f,
                "{}: no branch matches (connection: {}); no less specific branch is tried",
                self.criterion, self.connection
            ),
        }
    }
}

/// The answer of [`ChainIndex::explain`]: the steps, and the chosen `filter_chains` index as `select` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub steps: Vec<Step>,
    pub chain: Option<usize>,
}

impl fmt::Display for Explanation {
    /// One line per step, then `result: ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            writeln!(f, "{step}")?;
        }
        match self.chain {
            Some(i) => write!(f, "result: filter_chains[{i}]"),
            None => write!(
                f,
                "result: no filter chain matches (default_filter_chain if set, else the connection is closed)"
            ),
        }
    }
}

fn connection_value(c: &ConnAttrs<'_>, criterion: Criterion) -> String {
    match criterion {
        Criterion::DestinationPort => c.destination.port().to_string(),
        Criterion::PrefixRanges => c.destination.ip().to_canonical().to_string(),
        Criterion::ServerNames => match c.server_name {
            Some(name) if !name.is_empty() => name.to_ascii_lowercase(),
            _ => "no SNI".to_owned(),
        },
        Criterion::TransportProtocol if c.transport_protocol.is_empty() => "raw_buffer (none detected)".to_owned(),
        Criterion::TransportProtocol => c.transport_protocol.to_owned(),
        Criterion::ApplicationProtocols if c.application_protocols.is_empty() => "none".to_owned(),
        Criterion::ApplicationProtocols => c.application_protocols.join(", "),
        Criterion::DirectSourcePrefixRanges => c.direct_source.to_canonical().to_string(),
        Criterion::SourceType => {
            if is_same_ip_or_loopback(c.source.ip().to_canonical(), c.destination.ip().to_canonical()) {
                SourceType::SameIpOrLoopback.to_string()
            } else {
                SourceType::External.to_string()
            }
        }
        Criterion::SourcePrefixRanges => c.source.ip().to_canonical().to_string(),
        Criterion::SourcePorts => c.source.port().to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use serde_yaml_ng::Value;

    use super::*;

    // ---- Envoy YAML → proto (walks the YAML tree; snake_case field names as in a config dump) ----

    fn u32_of(v: &Value) -> u32 {
        u32::try_from(v.as_u64().unwrap_or_else(|| panic!("not a number: {v:?}"))).expect("u32")
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_sequence().expect("list").iter().map(|s| s.as_str().expect("string").to_owned()).collect()
    }

    fn cidr_list(v: &Value) -> Vec<CidrRange> {
        let ranges = v.as_sequence().expect("list of CidrRange");
        ranges
            .iter()
            .map(|r| CidrRange {
                address_prefix: r["address_prefix"].as_str().expect("address_prefix").to_owned(),
                prefix_len: r.get("prefix_len").map(|l| UInt32Value { value: u32_of(l) }),
            })
            .collect()
    }

    fn proto_of(v: &Value) -> FilterChainMatch {
        let mut m = FilterChainMatch::default();
        let Some(fields) = v.as_mapping() else {
            assert!(v.is_null(), "a FilterChainMatch is a mapping: {v:?}");
            return m;
        };
        for (key, v) in fields {
            match key.as_str().expect("field name") {
                "destination_port" => m.destination_port = Some(UInt32Value { value: u32_of(v) }),
                "prefix_ranges" => m.prefix_ranges = cidr_list(v),
                "address_suffix" => m.address_suffix = v.as_str().expect("string").to_owned(),
                "suffix_len" => m.suffix_len = Some(UInt32Value { value: u32_of(v) }),
                "direct_source_prefix_ranges" => m.direct_source_prefix_ranges = cidr_list(v),
                "source_type" => {
                    m.source_type = match v.as_str() {
                        Some(name) => ConnectionSourceType::from_str_name(name).expect("source_type name") as i32,
                        None => i32::try_from(u32_of(v)).expect("i32"),
                    }
                }
                "source_prefix_ranges" => m.source_prefix_ranges = cidr_list(v),
                "source_ports" => m.source_ports = v.as_sequence().expect("list").iter().map(u32_of).collect(),
                "server_names" => m.server_names = strings(v),
                "transport_protocol" => m.transport_protocol = v.as_str().expect("string").to_owned(),
                "application_protocols" => m.application_protocols = strings(v),
                other => panic!("unknown FilterChainMatch field {other}"),
            }
        }
        m
    }

    fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).expect("YAML")
    }

    /// A YAML list of FilterChainMatch, one per chain. The lines after the first lose their common indentation,
    /// so a block list can be indented with the code that holds it.
    fn matches(text: &str) -> Vec<ChainMatch> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default().trim_start();
        let rest: Vec<&str> = lines.collect();
        let indent = rest.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
        let rest = rest.iter().map(|l| l.get(indent.unwrap_or(0)..).unwrap_or_default());
        let list = yaml(&std::iter::once(first).chain(rest).collect::<Vec<_>>().join("\n"));
        list.as_sequence().expect("list").iter().map(|m| ChainMatch::from_proto(&proto_of(m)).expect("valid")).collect()
    }

    fn compile(text: &str) -> ChainIndex {
        ChainIndex::build(&matches(text)).expect("index")
    }

    fn build_error(text: &str) -> String {
        ChainIndex::build(&matches(text)).expect_err("overlap").to_string()
    }

    // ---- Connections ----

    #[derive(Clone)]
    struct Conn {
        destination: SocketAddr,
        source: SocketAddr,
        direct: Option<IpAddr>,
        sni: Option<&'static str>,
        transport: &'static str,
        alpn: Vec<String>,
    }

    /// A plaintext connection (nothing detected) to `destination` from 192.0.2.9:40000.
    fn to(destination: &str) -> Conn {
        Conn {
            destination: destination.parse().expect("destination"),
            source: "192.0.2.9:40000".parse().expect("source"),
            direct: None,
            sni: None,
            transport: "",
            alpn: Vec::new(),
        }
    }

    impl Conn {
        fn from(mut self, source: &str) -> Self {
            self.source = source.parse().expect("source");
            self
        }
        fn direct(mut self, ip: &str) -> Self {
            self.direct = Some(ip.parse().expect("direct source"));
            self
        }
        fn sni(mut self, name: &'static str) -> Self {
            self.sni = Some(name);
            self
        }
        fn tls(self) -> Self {
            self.transport("tls")
        }
        fn transport(mut self, t: &'static str) -> Self {
            self.transport = t;
            self
        }
        fn alpn(mut self, list: &[&str]) -> Self {
            self.alpn = list.iter().map(|s| s.to_string()).collect();
            self
        }
        fn attrs(&self) -> ConnAttrs<'_> {
            ConnAttrs {
                destination: self.destination,
                source: self.source,
                direct_source: self.direct.unwrap_or(self.source.ip()),
                server_name: self.sni,
                transport_protocol: self.transport,
                application_protocols: &self.alpn,
            }
        }
    }

    /// Each case: (what it shows, connection, expected `filter_chains` index). `explain` must agree with `select`.
    fn check(index: &ChainIndex, cases: &[(&str, Conn, Option<usize>)]) {
        for (what, conn, want) in cases {
            let got = index.select(&conn.attrs());
            let explanation = index.explain(&conn.attrs());
            assert_eq!(got, *want, "{what}\n{explanation}");
            assert_eq!(explanation.chain, got, "explain disagrees with select: {what}\n{explanation}");
        }
    }

    // ---- ChainMatch::from_proto ----

    #[test]
    fn cidr_is_masked_on_construction_like_envoy_cidr_range_create() {
        let cidr = |a: &str, len| Cidr::new(a.parse().unwrap(), len).to_string();
        assert_eq!(cidr("10.1.2.3", 8), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3", 32), "10.1.2.3/32");
        assert_eq!(cidr("10.1.2.3", 0), "0.0.0.0/0");
        assert_eq!(cidr("10.1.2.255", 25), "10.1.2.128/25");
        // truncateIpAddressAndLength clamps a length past the family's width.
        assert_eq!(cidr("10.1.2.3", 40), "10.1.2.3/32");
        assert_eq!(cidr("2001:db8:abcd::1", 32), "2001:db8::/32");
        assert_eq!(cidr("2001:db8::3", 127), "2001:db8::2/127");
        assert_eq!(cidr("2001:db8::1", 0), "::/0");

        let net = Cidr::new("10.0.0.0".parse().unwrap(), 8);
        assert!(net.contains("10.255.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!Cidr::ANY_V4.contains("::1".parse().unwrap()), "families never mix");
        assert!(Cidr::ANY_V6.contains("::1".parse().unwrap()));

        // Through the proto: masked, unset prefix_len is 0, an IPv4 length of 33..=128 is clamped like Envoy.
        let m = ChainMatch::from_proto(&proto_of(&yaml(
            "prefix_ranges: [{address_prefix: 10.1.2.3, prefix_len: 8}, {address_prefix: 10.1.2.3}, \
             {address_prefix: 10.1.2.3, prefix_len: 64}, {address_prefix: 'fd00::1', prefix_len: 8}]",
        )))
        .unwrap();
        let shown: Vec<String> = m.prefix_ranges().iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "0.0.0.0/0", "10.1.2.3/32", "fd00::/8"]);
    }

    #[test]
    fn from_proto_keeps_every_field_and_lowercases_server_names() {
        let m = ChainMatch::from_proto(&proto_of(&yaml(
            "{destination_port: 443, prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}], \
              server_names: ['*.Example.COM', WWW.example.com], transport_protocol: tls, \
              application_protocols: [h2, http/1.1], \
              direct_source_prefix_ranges: [{address_prefix: 192.168.0.0, prefix_len: 16}], \
              source_type: EXTERNAL, source_prefix_ranges: [{address_prefix: '2001:db8::', prefix_len: 32}], \
              source_ports: [1000, 2000]}",
        )))
        .unwrap();
        assert_eq!(m.destination_port(), Some(443));
        assert_eq!(m.prefix_ranges(), [Cidr::new("10.0.0.0".parse().unwrap(), 8)]);
        assert_eq!(m.server_names(), ["*.example.com", "www.example.com"]);
        assert_eq!(m.transport_protocol(), Some("tls"));
        assert_eq!(m.application_protocols(), ["h2", "http/1.1"]);
        assert_eq!(m.direct_source_prefix_ranges(), [Cidr::new("192.168.0.0".parse().unwrap(), 16)]);
        assert_eq!(m.source_type(), SourceType::External);
        assert_eq!(m.source_prefix_ranges(), [Cidr::new("2001:db8::".parse().unwrap(), 32)]);
        assert_eq!(m.source_ports(), [1000, 2000]);
        assert_eq!(ChainMatch::from_proto(&FilterChainMatch::default()).unwrap(), ChainMatch::default());
        assert_eq!(ChainMatch::try_from(&FilterChainMatch::default()).unwrap(), ChainMatch::default());
    }

    #[test]
    fn from_proto_rejects_with_the_field_path() {
        let cases = [
            ("{address_suffix: 10.0.0.1}", "address_suffix: not supported"),
            ("{suffix_len: 8}", "suffix_len: not supported"),
            // filter_chain_manager_impl.cc: a '*' anywhere but a leading "*." is a partial wildcard.
            ("{server_names: [a.com, '*w.example.com']}", "server_names[1]: partial wildcards are not supported"),
            ("{server_names: ['*']}", "server_names[0]: partial wildcards are not supported"),
            ("{server_names: ['www.*.com']}", "server_names[0]: partial wildcards are not supported"),
            ("{server_names: ['example.*']}", "server_names[0]: partial wildcards are not supported"),
            (
                "{prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}, {address_prefix: 10.0.0, prefix_len: 8}]}",
                r#"prefix_ranges[1].address_prefix: malformed IP address: "10.0.0""#,
            ),
            (
                "{direct_source_prefix_ranges: [{address_prefix: '', prefix_len: 0}]}",
                r#"direct_source_prefix_ranges[0].address_prefix: malformed IP address: """#,
            ),
            (
                "{source_prefix_ranges: [{address_prefix: '::', prefix_len: 129}]}",
                "source_prefix_ranges[0].prefix_len: prefix length 129 is too long (at most 128)",
            ),
            ("{destination_port: 0}", "destination_port: port must be between 1 and 65535, got 0"),
            ("{destination_port: 65536}", "destination_port: port must be between 1 and 65535, got 65536"),
            ("{source_ports: [80, 0]}", "source_ports[1]: port must be between 1 and 65535, got 0"),
            ("{source_ports: [70000]}", "source_ports[0]: port must be between 1 and 65535, got 70000"),
            ("{source_type: 7}", "source_type: unknown value 7"),
        ];
        for (text, want) in cases {
            let err = ChainMatch::from_proto(&proto_of(&yaml(text))).expect_err(text);
            assert_eq!(err.to_string(), want, "{text}");
            assert_eq!(format!("{}: {}", err.path, err.message), want);
        }
        // The only valid wildcard form.
        assert!(ChainMatch::from_proto(&proto_of(&yaml("{server_names: ['*.example.com']}"))).is_ok());
    }

    // ---- Selection ----

    #[test]
    fn destination_port_exact_hides_portless_chains_without_backtracking() {
        // findFilterChain: "There is entry for specific port but none of the filter chain matches. Instead of
        // matching catch-all port 0, the fallback filter chain is returned."
        let index = compile("[{destination_port: 8080, transport_protocol: tls}, {}]");
        check(
            &index,
            &[
                ("exact port, tls", to("10.0.0.1:8080").tls(), Some(0)),
                ("exact port, plaintext: dead end, never the port-less chain", to("10.0.0.1:8080"), None),
                ("other port: port-less chain", to("10.0.0.1:9090"), Some(1)),
                ("other port, tls", to("10.0.0.1:9090").tls(), Some(1)),
            ],
        );
        check(&compile("[{destination_port: 8080}]"), &[("no port-less chain", to("10.0.0.1:9090"), None)]);
    }

    #[test]
    fn prefix_ranges_longest_prefix_wins_and_empty_means_any() {
        let index = compile(
            "- prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]
             - prefix_ranges:
                 - {address_prefix: 10.1.0.0, prefix_len: 16}
                 - {address_prefix: 192.168.0.0, prefix_len: 16}
             - prefix_ranges: [{address_prefix: 10.1.2.3, prefix_len: 32}]
             - {}
             - prefix_ranges: [{address_prefix: '2001:db8::', prefix_len: 32}]",
        );
        check(
            &index,
            &[
                ("/8", to("10.9.9.9:80"), Some(0)),
                ("/16 beats /8", to("10.1.9.9:80"), Some(1)),
                ("/32 beats /16", to("10.1.2.3:80"), Some(2)),
                ("second prefix of a list", to("192.168.7.7:80"), Some(1)),
                ("no prefix: the empty list (0.0.0.0/0)", to("172.16.0.1:80"), Some(3)),
                ("IPv6 /32", to("[2001:db8::1]:80"), Some(4)),
                ("IPv6 outside: the empty list (::/0)", to("[2001:db9::1]:80"), Some(3)),
                ("IPv4-mapped IPv6 is matched as IPv4, as Envoy converts it", to("[::ffff:10.1.2.3]:80"), Some(2)),
            ],
        );
        let v4_only = compile("[{prefix_ranges: [{address_prefix: 0.0.0.0, prefix_len: 0}]}]");
        check(&v4_only, &[("0.0.0.0/0 does not cover IPv6", to("[2001:db8::1]:80"), None)]);
    }

    #[test]
    fn prefix_ranges_no_backtracking_to_a_shorter_prefix() {
        let index = compile(
            "- {prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}], server_names: [a.com]}
             - {prefix_ranges: [{address_prefix: 10.1.0.0, prefix_len: 16}], server_names: [b.com]}",
        );
        check(
            &index,
            &[
                ("/16 taken, a.com only under /8: dead end", to("10.1.1.1:443").sni("a.com"), None),
                ("/8", to("10.2.0.1:443").sni("a.com"), Some(0)),
                ("/16", to("10.1.1.1:443").sni("b.com"), Some(1)),
            ],
        );
    }

    #[test]
    fn prefix_ranges_listed_zero_prefix_ranks_above_an_empty_list() {
        // Envoy accepts this (different map keys) but leaves the runtime choice between the two equal trie
        // prefixes unspecified; the listed 0.0.0.0/0 is the more specific branch here.
        let index = compile(
            "- {transport_protocol: tls}
             - transport_protocol: tls
               prefix_ranges: [{address_prefix: 0.0.0.0, prefix_len: 0}]
               server_names: [a.com]",
        );
        check(
            &index,
            &[
                ("IPv4: the listed /0, then its name", to("10.0.0.1:443").tls().sni("a.com"), Some(1)),
                ("IPv4: the listed /0 dead-ends, never the empty list", to("10.0.0.1:443").tls().sni("b.com"), None),
                ("IPv6: only the empty list covers it", to("[2001:db8::1]:443").tls().sni("b.com"), Some(0)),
            ],
        );
    }

    #[test]
    fn server_names_exact_then_wildcards_longest_suffix_first_then_none() {
        // listener_components.proto: "www.example.com, then *.example.com, then *.com, then any filter chain
        // without server_names".
        let index = compile(
            "- server_names: [www.example.com]
             - server_names: ['*.example.com']
             - server_names: ['*.com']
             - {}
             - server_names: ['*.a.b.example.com']",
        );
        check(
            &index,
            &[
                ("exact", to("10.0.0.1:443").sni("www.example.com"), Some(0)),
                ("exact, compared lower-cased", to("10.0.0.1:443").sni("WWW.Example.COM"), Some(0)),
                ("wildcard", to("10.0.0.1:443").sni("api.example.com"), Some(1)),
                ("wildcard, several labels", to("10.0.0.1:443").sni("x.y.example.com"), Some(1)),
                ("longest wildcard wins", to("10.0.0.1:443").sni("z.a.b.example.com"), Some(4)),
                ("*.a.b.example.com needs a label before it", to("10.0.0.1:443").sni("a.b.example.com"), Some(1)),
                (
                    "*.example.com does not match example.com: shorter *.com",
                    to("10.0.0.1:443").sni("example.com"),
                    Some(2),
                ),
                ("shorter wildcard", to("10.0.0.1:443").sni("foo.com"), Some(2)),
                ("no wildcard: chains without server_names", to("10.0.0.1:443").sni("foo.org"), Some(3)),
                ("no SNI: chains without server_names", to("10.0.0.1:443"), Some(3)),
            ],
        );
    }

    #[test]
    fn server_names_no_sni_only_matches_chains_without_server_names() {
        check(
            &compile("[{server_names: ['*.example.com']}]"),
            &[
                ("no SNI", to("10.0.0.1:443"), None),
                ("empty SNI is no SNI", to("10.0.0.1:443").sni(""), None),
                ("SNI", to("10.0.0.1:443").sni("a.example.com"), Some(0)),
            ],
        );
        check(
            &compile("[{server_names: [a.com]}, {transport_protocol: tls}]"),
            &[
                ("no SNI, tls", to("10.0.0.1:443").tls(), Some(1)),
                ("listed SNI", to("10.0.0.1:443").sni("a.com"), Some(0)),
                ("unlisted SNI falls to chains without names, which need tls", to("10.0.0.1:443").sni("b.com"), None),
            ],
        );
    }

    #[test]
    fn server_names_no_backtracking_from_a_name_branch() {
        let wildcard =
            compile("[{server_names: ['*.example.com'], transport_protocol: tls}, {transport_protocol: raw_buffer}]");
        check(
            &wildcard,
            &[
                ("wildcard branch taken, no raw_buffer chain there", to("10.0.0.1:443").sni("www.example.com"), None),
                ("other name: chains without names", to("10.0.0.1:443").sni("www.other.com"), Some(1)),
            ],
        );
        let exact = compile(
            "[{server_names: [www.example.com], application_protocols: [h2]}, {server_names: ['*.example.com']}]",
        );
        check(
            &exact,
            &[
                (
                    "exact branch taken, never the wildcard",
                    to("10.0.0.1:443").sni("www.example.com").alpn(&["http/1.1"]),
                    None,
                ),
                ("exact branch", to("10.0.0.1:443").sni("www.example.com").alpn(&["h2"]), Some(0)),
                ("wildcard", to("10.0.0.1:443").sni("api.example.com").alpn(&["http/1.1"]), Some(1)),
            ],
        );
    }

    #[test]
    fn transport_protocol_exact_then_chains_without_one() {
        let index = compile(
            "- {transport_protocol: tls}
             - {}
             - {destination_port: 9000, transport_protocol: raw_buffer}",
        );
        check(
            &index,
            &[
                ("tls", to("10.0.0.1:443").tls(), Some(0)),
                (
                    "raw_buffer: no such chain, chains without transport_protocol",
                    to("10.0.0.1:443").transport("raw_buffer"),
                    Some(1),
                ),
                ("nothing detected", to("10.0.0.1:443"), Some(1)),
                ("nothing detected is raw_buffer (ActiveTcpSocket sets it)", to("10.0.0.1:9000"), Some(2)),
                ("exact port, tls: dead end", to("10.0.0.1:9000").tls(), None),
            ],
        );
    }

    #[test]
    fn application_protocols_walk_the_client_list_in_order() {
        // findFilterChainForApplicationProtocols iterates the connection's list; the first listed value wins.
        let index = compile(
            "- application_protocols: [h2]
             - application_protocols: [http/1.1, http/1.0]
             - {}",
        );
        check(
            &index,
            &[
                ("client prefers h2", to("10.0.0.1:443").tls().alpn(&["h2", "http/1.1"]), Some(0)),
                ("client prefers http/1.1", to("10.0.0.1:443").tls().alpn(&["http/1.1", "h2"]), Some(1)),
                ("unlisted values skipped", to("10.0.0.1:443").tls().alpn(&["foo", "http/1.0"]), Some(1)),
                ("nothing listed: chains without ALPN", to("10.0.0.1:443").tls().alpn(&["foo"]), Some(2)),
                ("no ALPN", to("10.0.0.1:443"), Some(2)),
            ],
        );
        check(&index_of_h2_only(), &[("no fallback chain", to("10.0.0.1:443").alpn(&["http/1.1"]), None)]);
    }

    fn index_of_h2_only() -> ChainIndex {
        compile("[{application_protocols: [h2]}]")
    }

    #[test]
    fn direct_source_prefix_ranges_use_the_directly_connected_peer() {
        let index = compile(
            "- direct_source_prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]
             - direct_source_prefix_ranges: [{address_prefix: 10.1.0.0, prefix_len: 16}]
             - {}",
        );
        check(
            &index,
            &[
                ("longest prefix", to("10.9.0.1:80").from("192.0.2.1:4000").direct("10.1.1.1"), Some(1)),
                ("/8", to("10.9.0.1:80").from("192.0.2.1:4000").direct("10.2.0.1"), Some(0)),
                ("outside: empty list", to("10.9.0.1:80").from("192.0.2.1:4000").direct("172.16.0.1"), Some(2)),
                (
                    "PROXY protocol source does not count",
                    to("10.9.0.1:80").from("10.1.1.1:4000").direct("172.16.0.1"),
                    Some(2),
                ),
            ],
        );
    }

    #[test]
    fn source_type_same_ip_or_loopback_and_external_before_any() {
        let index = compile(
            "- {source_type: SAME_IP_OR_LOOPBACK}
             - {source_type: EXTERNAL, source_ports: [5000]}
             - {}",
        );
        check(
            &index,
            &[
                ("loopback 127.0.0.1", to("10.0.0.5:80").from("127.0.0.1:4000"), Some(0)),
                ("loopback ::1", to("[::1]:80").from("[::1]:4000"), Some(0)),
                ("same IP", to("10.0.0.5:80").from("10.0.0.5:4000"), Some(0)),
                ("same IP through IPv4-mapped", to("10.0.0.5:80").from("[::ffff:10.0.0.5]:4000"), Some(0)),
                // Envoy's isLoopbackAddress is 127.0.0.1 exactly, not 127/8.
                ("127.0.0.2 is external", to("10.0.0.5:80").from("127.0.0.2:5000"), Some(1)),
                ("external branch dead end: never ANY", to("10.0.0.5:80").from("192.0.2.1:4000"), None),
            ],
        );
        let local_or_any = compile("[{source_type: SAME_IP_OR_LOOPBACK}, {}]");
        check(
            &local_or_any,
            &[
                ("external, no EXTERNAL chains: ANY", to("10.0.0.5:80").from("192.0.2.1:4000"), Some(1)),
                ("local", to("10.0.0.5:80").from("127.0.0.1:4000"), Some(0)),
            ],
        );
        let external_or_any = compile("[{source_type: EXTERNAL}, {}]");
        check(
            &external_or_any,
            &[
                ("local, no SAME_IP_OR_LOOPBACK chains: ANY", to("10.0.0.5:80").from("127.0.0.1:4000"), Some(1)),
                ("external", to("10.0.0.5:80").from("192.0.2.1:4000"), Some(0)),
            ],
        );
    }

    #[test]
    fn source_prefix_ranges_longest_then_source_ports_exact_then_none() {
        let index = compile(
            "- source_prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]
             - {source_prefix_ranges: [{address_prefix: 10.1.0.0, prefix_len: 16}], source_ports: [1000, 2000]}
             - source_prefix_ranges: [{address_prefix: 10.1.0.0, prefix_len: 16}]
             - source_ports: [3000]",
        );
        check(
            &index,
            &[
                ("/16 and exact port", to("10.9.0.1:80").from("10.1.1.1:1000"), Some(1)),
                ("second port of the list", to("10.9.0.1:80").from("10.1.1.1:2000"), Some(1)),
                ("/16, other port: chains without ports", to("10.9.0.1:80").from("10.1.1.1:5"), Some(2)),
                ("/8", to("10.9.0.1:80").from("10.2.1.1:1000"), Some(0)),
                ("no prefix, exact port", to("10.9.0.1:80").from("192.0.2.1:3000"), Some(3)),
                ("no prefix, other port", to("10.9.0.1:80").from("192.0.2.1:4000"), None),
            ],
        );
        let no_backtracking = compile(
            "- {source_prefix_ranges: [{address_prefix: 10.1.0.0, prefix_len: 16}], source_ports: [1000]}
             - source_prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]",
        );
        check(&no_backtracking, &[("/16 taken, port dead end", to("10.9.0.1:80").from("10.1.1.1:5"), None)]);
    }

    #[test]
    fn select_ignores_the_order_of_chains() {
        // Specificity, not list order, decides: the same chains reversed give the same answers.
        let forward = "[{server_names: ['*.example.com']}, {server_names: [www.example.com]}, {}]";
        let reversed = "[{}, {server_names: [www.example.com]}, {server_names: ['*.example.com']}]";
        let (forward, reversed) = (compile(forward), compile(reversed));
        for (sni, f, r) in [("www.example.com", 1, 1), ("a.example.com", 0, 2), ("b.org", 2, 0)] {
            let conn = to("10.0.0.1:443").sni(sni);
            assert_eq!(forward.select(&conn.attrs()), Some(f), "{sni}");
            assert_eq!(reversed.select(&conn.attrs()), Some(r), "{sni}");
        }
    }

    // ---- Build rejections ----

    #[test]
    fn build_rejects_identical_matches() {
        assert_eq!(
            build_error("[{}, {}]"),
            "multiple filter chains with the same matching rules are defined: filter_chains[1] has the same \
             matching rules defined as filter_chains[0]"
        );
        let err = ChainIndex::build(&matches("[{server_names: [a.com]}, {}, {server_names: [A.com]}]")).unwrap_err();
        assert_eq!(err, IndexError::SameRules { first: 0, second: 2 });
        assert_eq!(err.chain(), 2);
    }

    #[test]
    fn build_rejects_overlapping_expanded_matches() {
        let cases = [
            (
                "[{server_names: [a.com, b.com]}, {server_names: [b.com]}]",
                "filter_chains[0] and filter_chains[1] both match server_names b.com",
            ),
            (
                "[{destination_port: 80, application_protocols: [h2, http/1.1]}, \
                  {destination_port: 80, application_protocols: [http/1.1, h3]}]",
                "filter_chains[0] and filter_chains[1] both match destination_port 80, application_protocols http/1.1",
            ),
            (
                // Masking makes 10.1.0.0/8 the same range as 10.0.0.0/8.
                "[{prefix_ranges: [{address_prefix: 10.1.0.0, prefix_len: 8}]}, \
                  {prefix_ranges: [{address_prefix: 11.0.0.0, prefix_len: 8}, \
                                   {address_prefix: 10.0.0.0, prefix_len: 8}]}]",
                "filter_chains[0] and filter_chains[1] both match prefix_ranges 10.0.0.0/8",
            ),
            (
                "[{server_names: ['*.example.com'], source_ports: [1, 2]}, \
                  {server_names: ['*.Example.com'], source_ports: [2]}]",
                "filter_chains[0] and filter_chains[1] both match server_names *.example.com, source_ports 2",
            ),
            ("[{server_names: [a.com, A.COM]}]", "filter_chains[0] lists the same match twice (server_names a.com)"),
            ("[{source_ports: [80, 80]}]", "filter_chains[0] lists the same match twice (source_ports 80)"),
        ];
        for (text, want) in cases {
            assert_eq!(
                build_error(text),
                format!("multiple filter chains with overlapping matching rules are defined: {want}"),
                "{text}"
            );
        }
    }

    #[test]
    fn build_accepts_chains_that_differ_in_any_criterion() {
        let index = compile(
            "- server_names: [a.com]
             - server_names: [b.com]
             - server_names: ['*.a.com']
             - {}
             - destination_port: 80
             - {destination_port: 80, transport_protocol: tls}
             - {source_type: SAME_IP_OR_LOOPBACK}
             - {source_type: EXTERNAL}
             - direct_source_prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]
             - prefix_ranges: [{address_prefix: '2001:db8::', prefix_len: 32}]",
        );
        check(
            &index,
            &[
                ("IPv6 prefix", to("[2001:db8::1]:443").sni("x.org"), Some(9)),
                ("port 80", to("10.0.0.1:80"), Some(4)),
                ("port 80 tls", to("10.0.0.1:80").tls(), Some(5)),
                ("external", to("10.0.0.1:443"), Some(7)),
                ("local", to("10.0.0.1:443").from("127.0.0.1:1"), Some(6)),
                ("direct source", to("10.0.0.1:443").from("10.2.2.2:1"), Some(8)),
            ],
        );
        assert!(ChainIndex::build(&[]).is_ok());
        assert_eq!(ChainIndex::build(&[]).unwrap().select(&to("10.0.0.1:80").attrs()), None);
    }

    // ---- Explain ----

    #[test]
    fn explain_renders_one_line_per_step() {
        let index = compile(
            "- {destination_port: 443, server_names: ['*.example.com'], transport_protocol: tls}
             - {destination_port: 443, transport_protocol: tls}
             - {prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}], application_protocols: [h2]}",
        );
        let conn = to("10.0.0.1:443").sni("API.example.com").tls().alpn(&["h2", "http/1.1"]);
        assert_eq!(
            index.explain(&conn.attrs()).to_string(),
            "destination_port: exact 443 (connection: 443)
prefix_ranges: none listed (fallback) (connection: 10.0.0.1)
server_names: wildcard *.example.com (connection: api.example.com)
transport_protocol: exact tls (connection: tls)
application_protocols: none listed (fallback) (connection: h2, http/1.1)
direct_source_prefix_ranges: none listed (fallback) (connection: 192.0.2.9)
source_type: ANY (fallback) (connection: EXTERNAL)
source_prefix_ranges: none listed (fallback) (connection: 192.0.2.9)
source_ports: none listed (fallback) (connection: 40000)
result: filter_chains[0]"
        );

        let plaintext = to("10.0.0.1:443");
        assert_eq!(
            index.explain(&plaintext.attrs()).to_string(),
            "destination_port: exact 443 (connection: 443)
prefix_ranges: none listed (fallback) (connection: 10.0.0.1)
server_names: none listed (fallback) (connection: no SNI)
transport_protocol: no branch matches (connection: raw_buffer (none detected)); no less specific branch is tried
result: no filter chain matches (default_filter_chain if set, else the connection is closed)"
        );

        let other_port = to("10.0.0.1:80").alpn(&["http/1.1", "h2"]);
        let explanation = index.explain(&other_port.attrs());
        assert_eq!(explanation.chain, Some(2));
        assert_eq!(explanation.steps[0].taken, Some(Taken::Fallback));
        assert_eq!(explanation.steps[1].taken, Some(Taken::Prefix(Cidr::new("10.0.0.0".parse().unwrap(), 8))));
        assert_eq!(explanation.steps[4].to_string(), "application_protocols: exact h2 (connection: http/1.1, h2)");

        let local = compile("[{source_type: SAME_IP_OR_LOOPBACK}, {source_ports: [7]}]");
        let explanation = local.explain(&to("10.0.0.1:80").from("127.0.0.1:7").attrs());
        assert_eq!(
            explanation.steps[6].to_string(),
            "source_type: SAME_IP_OR_LOOPBACK (connection: SAME_IP_OR_LOOPBACK)"
        );
        assert_eq!(explanation.chain, Some(0));
    }

    // ---- Istio 1.14 virtualInbound ----

    /// The `filter_chain_match` of each chain of Istio 1.14's virtualInbound listener, in order, copied from
    /// /work/shared/fixtures/istio-1.14-sidecar-config-dump.yaml (`istio_fixture_has_these_chains` checks the copy).
    const VIRTUAL_INBOUND: &str = "
- name: virtualInbound-blackhole
  filter_chain_match: {destination_port: 15006}
- name: virtualInbound-catchall-http
  filter_chain_match:
    prefix_ranges: [{address_prefix: 0.0.0.0, prefix_len: 0}]
    transport_protocol: tls
    application_protocols: [istio-http/1.0, istio-http/1.1, istio-h2]
- name: virtualInbound-catchall-http
  filter_chain_match:
    prefix_ranges: [{address_prefix: 0.0.0.0, prefix_len: 0}]
    transport_protocol: raw_buffer
    application_protocols: [http/1.1, h2c]
- name: virtualInbound
  filter_chain_match:
    prefix_ranges: [{address_prefix: 0.0.0.0, prefix_len: 0}]
    transport_protocol: tls
    application_protocols: [istio-peer-exchange, istio]
- name: virtualInbound
  filter_chain_match:
    prefix_ranges: [{address_prefix: 0.0.0.0, prefix_len: 0}]
    transport_protocol: raw_buffer
- name: virtualInbound
  filter_chain_match:
    prefix_ranges: [{address_prefix: 0.0.0.0, prefix_len: 0}]
    transport_protocol: tls
- name: 0.0.0.0_8070
  filter_chain_match:
    destination_port: 8070
    transport_protocol: tls
    application_protocols: [istio, istio-peer-exchange, istio-http/1.0, istio-http/1.1, istio-h2]
- name: 0.0.0.0_8070
  filter_chain_match: {destination_port: 8070, transport_protocol: raw_buffer}
- name: 0.0.0.0_8079
  filter_chain_match:
    destination_port: 8079
    transport_protocol: tls
    application_protocols: [istio, istio-peer-exchange, istio-http/1.0, istio-http/1.1, istio-h2]
- name: 0.0.0.0_8079
  filter_chain_match: {destination_port: 8079, transport_protocol: raw_buffer}
- name: 0.0.0.0_8080
  filter_chain_match:
    destination_port: 8080
    transport_protocol: tls
    application_protocols: [istio, istio-peer-exchange, istio-http/1.0, istio-http/1.1, istio-h2]
- name: 0.0.0.0_8080
  filter_chain_match: {destination_port: 8080, transport_protocol: raw_buffer}
";

    /// (chain name, FilterChainMatch) for each entry of a `filter_chains` YAML list.
    fn named_chains(list: &Value) -> Vec<(String, FilterChainMatch)> {
        let chains = list.as_sequence().expect("filter_chains");
        chains
            .iter()
            .map(|c| (c["name"].as_str().expect("name").to_owned(), proto_of(&c["filter_chain_match"])))
            .collect()
    }

    fn istio_fixture() -> String {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let candidates = [
            manifest.join("../shared/fixtures/istio-1.14-sidecar-config-dump.yaml"),
            manifest.join("tests/fixtures/istio-1.14-sidecar-config-dump.yaml"),
        ];
        candidates
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_else(|| panic!("Istio fixture not found in {candidates:?}"))
    }

    #[test]
    fn istio_fixture_has_these_chains() {
        let dump = yaml(&istio_fixture());
        let configs = dump["configs"].as_sequence().expect("configs");
        let listener = configs
            .iter()
            .filter_map(|c| c.get("dynamic_listeners")?.as_sequence())
            .flatten()
            .find(|l| l["name"].as_str() == Some("virtualInbound"))
            .expect("virtualInbound");
        let from_fixture = named_chains(&listener["active_state"]["listener"]["filter_chains"]);
        assert_eq!(from_fixture, named_chains(&yaml(VIRTUAL_INBOUND)));
    }

    #[test]
    fn istio_virtual_inbound_connections_take_the_expected_chains() {
        let chains = named_chains(&yaml(VIRTUAL_INBOUND));
        let matches: Vec<ChainMatch> = chains.iter().map(|(_, m)| ChainMatch::from_proto(m).unwrap()).collect();
        let index = ChainIndex::build(&matches).unwrap();
        let pod = "172.21.206.230";
        let at = |port: u16| to(&format!("{pod}:{port}")).from("10.244.1.7:51000");
        let cases = [
            ("mTLS TCP to 8080", at(8080).tls().alpn(&["istio-peer-exchange", "istio"]), Some((10, "0.0.0.0_8080"))),
            ("mTLS HTTP to 8080", at(8080).tls().alpn(&["istio-http/1.1", "istio"]), Some((10, "0.0.0.0_8080"))),
            ("plaintext HTTP to 8080", at(8080).alpn(&["http/1.1"]), Some((11, "0.0.0.0_8080"))),
            ("plaintext TCP to 8070", at(8070), Some((7, "0.0.0.0_8070"))),
            ("TLS with foreign ALPN to 8080: exact port, no fallback ALPN", at(8080).tls().alpn(&["h2"]), None),
            ("raw TCP to 15006 itself", at(15006), Some((0, "virtualInbound-blackhole"))),
            ("TLS to 15006 itself", at(15006).tls().alpn(&["istio"]), Some((0, "virtualInbound-blackhole"))),
            (
                "plaintext HTTP to an undeclared port",
                at(9090).alpn(&["http/1.1"]),
                Some((2, "virtualInbound-catchall-http")),
            ),
            (
                "mTLS HTTP to an undeclared port",
                at(9090).tls().alpn(&["istio-h2"]),
                Some((1, "virtualInbound-catchall-http")),
            ),
            (
                "mTLS TCP to an undeclared port",
                at(9090).tls().alpn(&["istio-peer-exchange", "istio"]),
                Some((3, "virtualInbound")),
            ),
            (
                "client ALPN order: h2 unlisted, istio listed",
                at(9090).tls().alpn(&["h2", "istio"]),
                Some((3, "virtualInbound")),
            ),
            ("plaintext TCP to an undeclared port", at(9090), Some((4, "virtualInbound"))),
            ("TLS without Istio ALPN to an undeclared port", at(9090).tls().alpn(&["h2"]), Some((5, "virtualInbound"))),
            ("IPv6 to an undeclared port: only 0.0.0.0/0 listed", to("[fd00::5]:9090"), None),
        ];
        for (what, conn, want) in cases {
            let got = index.select(&conn.attrs());
            let explanation = index.explain(&conn.attrs());
            assert_eq!(got, want.map(|(i, _)| i), "{what}\n{explanation}");
            assert_eq!(explanation.chain, got);
            if let Some((i, name)) = want {
                assert_eq!(chains[i].0, name, "{what}");
            }
        }
    }
}
